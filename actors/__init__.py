"""saferl.actors"""
