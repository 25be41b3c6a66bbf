"""The one place that patches around old BasicSR (see ``_esc_arch_tv_alias``)."""
import _esc_arch_tv_alias

_esc_arch_tv_alias.install()
