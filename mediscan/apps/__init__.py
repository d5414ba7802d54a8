"""Layer 4: what users run: the API and its server, the dashboard, the bodies of the command-line tools."""
