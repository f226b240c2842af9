"""Developer tooling: the local control plane that tests and the demo run on.

Nothing here is part of the product that runs in a user's cluster.
"""
