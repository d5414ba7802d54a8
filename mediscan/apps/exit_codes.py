"""Exit codes shared by the command-line tools (documented in the README)."""

EXIT_OK = 0
#: Bad input: an unreadable image, an unknown class, a malformed dataset; the message says which and why.
EXIT_BAD_INPUT = 2
#: No usable model: a missing or invalid checkpoint; the message names the command that trains one.
EXIT_NO_MODEL = 3
