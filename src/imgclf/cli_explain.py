"""The `explain` subcommand (registered in cli.COMMANDS)."""
