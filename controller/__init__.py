"""The global controller: routing, admission, autoscaling and expert buffering decisions."""
