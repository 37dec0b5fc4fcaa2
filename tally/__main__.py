from tally.service.cli import main

main()
