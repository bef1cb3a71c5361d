"""saferl.cluster"""
