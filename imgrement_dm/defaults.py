"""Defaults the API and the CLI share, in a module that imports nothing.

The CLI builds its options (and their help) before it knows which command
runs, so what they show as a default must not pull in the API.
"""

#: The name of the traced device under /dev/mapper when none is given.
DEFAULT_NAME = "traced"
