"""The gradient methods: how the meta-gradient of a solve is computed.

`_method` holds the `GradientMethod` interface and the helpers every method
shares; each other module holds one method (`_forward`, `_backprop`,
`_adjoint`, `_discrete_adjoint`, `_auto`). `comln_tf.engine` exports them.
"""
