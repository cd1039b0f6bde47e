"""Generation over a chain of spans, local or remote: sampling, failover, and who pays (`Charge`)."""
