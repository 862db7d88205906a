from bnfix.cli import main

main()
