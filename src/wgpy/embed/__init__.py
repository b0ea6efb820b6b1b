"""wgpy inside a program: `Interface` (a real TUN served from a background thread), and
`netconf`, which gives an interface its addresses and routes."""
