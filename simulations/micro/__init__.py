"""Timing scripts: one measured piece each, printed (``python simulations/micro/<name>.py``).

* :mod:`simulations.micro.dp_step_time`  one optimizer step with and without Opacus;
* :mod:`simulations.micro.fusion_speed`  fusion time and memory up to thousands of sites;
* :mod:`simulations.micro.text_teacher`  a text teacher site's round: time, memory, DP.
"""
