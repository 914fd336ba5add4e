"""Over-the-air block updates: nothing runs that was not signed, fetched whole, self-tested."""
