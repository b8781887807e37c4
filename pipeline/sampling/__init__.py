"""From a mixture plan to example positions: allocation, permutations, the sampler, batch geometry."""
