#!/bin/sh
# Stands in for ssh in the launch tests: runs a shell line "on a host", i.e. inside the
# network namespace named like the host, with that hostname.
host=$1
shift
exec ip netns exec "$host" unshare --uts sh -c "hostname $host && $*"
