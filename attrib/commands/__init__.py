"""One module per subcommand; each function's signature is its CLI and its recipe keys."""
