"""The DVC stages behind the CLI: fetch, normalize, summarize, and the checks around them."""
