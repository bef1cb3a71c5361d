"""saferl.envs"""
