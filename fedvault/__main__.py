"""`python -m fedvault` runs the command-line interface."""

from fedvault.cli.app import main

main()
