"""`pdserve ...`: the command line, on top of every other part (nothing imports it)."""
