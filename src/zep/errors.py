"""The configuration error every settings parser raises (config, egress rules, upstream proxy)."""


class ConfigError(Exception):
    """Bad configuration: the CLI prints the message on one line and exits with code 2."""
