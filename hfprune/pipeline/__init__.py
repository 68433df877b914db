"""One run as a table of stages over a workspace: the stage table, what stages take from outside (providers), the stages."""
