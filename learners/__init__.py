"""saferl.learners"""
