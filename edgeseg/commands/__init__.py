"""One module per `edgeseg` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
