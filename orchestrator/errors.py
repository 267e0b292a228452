"""The one exception the CLI turns into a single clear line and exit code 2."""

import click


class UsageError(click.ClickException):
    """Bad input: unknown family/study, malformed YAML, out-of-range value, unreachable service."""

    exit_code = 2

    def format_message(self) -> str:
        return self.message
