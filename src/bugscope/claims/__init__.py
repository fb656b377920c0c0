"""The claims ledger: the claims file's grammar, the verdict rules evaluated on the results tables, and
the ledger rendered as Markdown and HTML."""
