"""kopf handlers, one concern per module; `register` puts them in a registry."""
