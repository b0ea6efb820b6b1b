"""Control plane: UAPI, configuration files and the command line."""
