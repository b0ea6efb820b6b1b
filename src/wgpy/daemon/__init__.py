"""The daemon behind `wgpy IFNAME` (daemon.py): the UAPI it serves (uapi.py, the protocol;
uapi_server.py, the socket) and what it reports (log.py, status.py, metrics.py, keylog.py).
Configuration files and the command line are the tools' (tools/) and cli.py's."""
