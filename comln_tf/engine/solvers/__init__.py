"""The ODE solvers: the `Solver` interface and its implementations.

`_solver` holds the interface, `SolveStats` and the Runge-Kutta helpers the
solvers share; `_dopri5` the adaptive Dormand-Prince, `_fixed_step` Euler
and RK4, `_tfp` TensorFlow Probability's solvers (imported only when one is
built). `comln_tf.engine` exports them.
"""
