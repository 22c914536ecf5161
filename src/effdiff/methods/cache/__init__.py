"""Feature caching: reuse (or forecast) denoiser features across steps, on U-Nets and DiTs alike."""

from effdiff.methods.cache.base import CacheMethod, CacheStats
from effdiff.methods.cache.deepcache import DeepCache
from effdiff.methods.cache.dynamic import DeltaDiT, FirstBlockCache, TaylorSeer
from effdiff.methods.cache.faster import FasterDiffusion
from effdiff.methods.cache.fora import Fora
from effdiff.methods.cache.l2c import LearningToCache
from effdiff.methods.cache.teacache import TeaCache
from effdiff.methods.cache.toca import ToCa

__all__ = ["CacheMethod", "CacheStats", "DeepCache", "DeltaDiT", "FasterDiffusion", "FirstBlockCache", "Fora",
           "LearningToCache", "TaylorSeer", "TeaCache", "ToCa"]
