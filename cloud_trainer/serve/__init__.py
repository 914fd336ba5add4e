"""Split inference and the web console: what answers devices and operators at run time."""
