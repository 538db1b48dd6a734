"""The `review`, `rank`, `embed` and `similar` subcommands (registered in cli.COMMANDS)."""
