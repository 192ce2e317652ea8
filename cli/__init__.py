"""edge-llm's command line: the only package that prints, knows terminals or sets exit codes."""
