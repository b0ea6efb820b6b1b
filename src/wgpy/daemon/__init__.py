"""The daemon behind `wgpy IFNAME` (daemon.py): the UAPI it serves (uapi.py, the protocol;
uapi_server.py, the socket) and what it reports (log.py, status.py, metrics.py, keylog.py);
hosts.py, the Host check of the local HTTP listeners (the web page's, `proxy --info`'s).
Configuration files and the command line are the tools' (tools/) and cli.py's."""
