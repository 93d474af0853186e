"""The typed configuration every part reads: one module per section of the cluster config
(`cluster.py` is the root), plus the autoscaling policy file. Pure pydantic models and file
reading; they import no other part of pdserve."""
