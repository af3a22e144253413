"""placeholder"""


def dedup_distributed(dataset, config, ctx):
    raise NotImplementedError
