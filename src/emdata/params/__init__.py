"""params.yaml: the typed parsers every source uses, the configuration, and where files live."""
