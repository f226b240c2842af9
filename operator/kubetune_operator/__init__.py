"""The kubetune operator: reconciles FineTuningJobs into training Jobs.

Pure functions (`naming`, `builders`, `observe`, `status`, `failures`,
`registration`) decide; `reconcile` applies their decisions against the API;
`handlers` connects kopf's watches to a work queue; `main` starts it all.
This package never imports the trainer or torch.
"""
