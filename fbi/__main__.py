from fbi.cli import main
from fbi.process_exit import run_and_exit

run_and_exit(main)  # under torchrun (data verify, data prepare) gloo threads can abort teardown
