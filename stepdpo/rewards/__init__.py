"""Step scorers. Each is selected by the `reward` config group and built with `stepdpo.config.build`."""
