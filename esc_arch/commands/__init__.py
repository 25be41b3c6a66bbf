"""Subcommands of the ``basicsr`` console command (see esc_arch/cli.py)."""
