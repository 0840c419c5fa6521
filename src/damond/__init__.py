"""damond: DAMON-style data-access monitoring from user space, served over D-Bus."""
