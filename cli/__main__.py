"""`python -m cli`: the `drover` command."""

from cli.main import main

main()
