"""The sweep generator: grid -> cells -> plans -> manifests (critbatch.jobs.cluster submits them)."""
