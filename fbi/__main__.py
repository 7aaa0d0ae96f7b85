from fbi.cli import main

main()
