"""Statistics on aggregates: pure functions of counts and sums, returning small result objects."""
