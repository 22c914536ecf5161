"""Tuning: calibration and search above the methods (TeaCache's polynomial and threshold, L2C's router and
cached fraction). A method names its tuner module (``Method.tuner``); ``effdiff calibrate --method NAME``
runs it. Tuners call methods through the public API; methods never import this package.
"""
