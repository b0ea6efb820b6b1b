"""`wgpy server` and `wgpy client`: a VPN server for phones and laptops (docs/server.md)."""
