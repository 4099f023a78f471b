"""params.yaml: ``schema`` (how keys are read and typed), ``config`` (the configuration) and
``layout`` (where each dataset's files live). Nothing here knows a source kind."""
