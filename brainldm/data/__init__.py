"""Data in: NSD (on disk or from its bucket) or your own experiment, read into the trials dataset and its voxels,
and the feature store that holds the LDM's features of the stimuli. Imports only the ground floor."""
