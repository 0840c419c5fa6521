# damond: `make demo` shows it monitoring a real process; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Debian packages the daemon, its build and its tests need (systemd-container:
# the packaging test boots the unit under systemd-nspawn; file: damo's report
# commands, run on damondctl's records in the tests, detect a record's format with it).
APT_PACKAGES := dbus systemd systemd-container libsystemd-dev pkg-config gcc python3-dev file

.PHONY: all deps venv vm-image test lint demo bench clean install uninstall

all: venv

deps:
	@scripts/ensure-apt $(APT_PACKAGES)

# The C modules are built by pip (pyproject.toml's ext-modules): rebuild when they change.
$(VENV)/.installed: pyproject.toml src/damond/monitor/ops/_page_idle.c \
		src/damond/monitor/ops/_damon_trace.c
	@$(MAKE) --no-print-directory deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tools]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

# The real-kernel rig of tests/vm: a kernel with page_idle and DAMON, built
# once per machine (about 5 minutes) and cached in /var/cache/damond-test-kernel.
vm-image:
	tests/vm/build-kernel >/dev/null
	tests/vm/initramfs >/dev/null

test: venv vm-image
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest

demo: venv
	$(PY) -m damond.tools.demo

bench: venv vm-image
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# --- Installing as a system service (docs/operations.md) ---------------------
# make install [PREFIX=/usr/local] [DESTDIR=] [DBUS_POLICY_DIR=...]
PREFIX          ?= /usr/local
DESTDIR         ?=
BINDIR          := $(PREFIX)/bin
VENVDIR         := $(PREFIX)/lib/damond
UNITDIR         := $(PREFIX)/lib/systemd/system
DBUS_SERVICEDIR := $(PREFIX)/share/dbus-1/system-services
DOCDIR          := $(PREFIX)/share/doc/damond
# The system bus reads policies only from /usr/share/dbus-1/system.d and
# /etc/dbus-1/system.d: the first for PREFIX=/usr, the second otherwise.
DBUS_POLICY_DIR ?= $(if $(filter /usr,$(PREFIX)),/usr/share/dbus-1/system.d,/etc/dbus-1/system.d)
# Debian's interpreter, not pyenv's (under /root, hidden by ProtectHome=).
SYSTEM_PYTHON   ?= /usr/bin/python3
INSTALL_APT_PACKAGES := python3-venv python3-dev libsystemd-dev pkg-config gcc
# Names whose first call starts the daemon (root's, group damond's, everyone's):
# one activation file each, made from packaging/org.damond1.service.
ACTIVATED_NAMES := org.damond1 org.damond1.Readers org.damond1.Public
# Optional dependencies installed with damond: "tools" is what damondctl and
# damond-exporter need (EXTRAS= installs the daemon's own dependencies only).
EXTRAS          ?= tools
# The commands linked into BINDIR from the venv.
COMMANDS        := damond damondctl damond-exporter
# The packaging files name /usr/local; this points them at PREFIX.
SUBST := sed -e '/^\#/!s|/usr/local/bin/damond|$(BINDIR)/damond|g' \
             -e '/^\#/!s|/usr/local/share/doc/damond|$(DOCDIR)|g'

install:
	@scripts/ensure-apt $(INSTALL_APT_PACKAGES)
	scripts/install-venv $(SYSTEM_PYTHON) $(CURDIR) $(DESTDIR)$(VENVDIR) $(VENVDIR) "$(EXTRAS)"
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DBUS_SERVICEDIR) \
		$(DESTDIR)$(DBUS_POLICY_DIR) $(DESTDIR)$(DOCDIR)
	for tool in $(COMMANDS); do ln -sfn $(VENVDIR)/bin/$$tool $(DESTDIR)$(BINDIR)/$$tool; done
	$(SUBST) packaging/damond.service > $(DESTDIR)$(UNITDIR)/damond.service
	$(SUBST) packaging/damond-exporter.service > $(DESTDIR)$(UNITDIR)/damond-exporter.service
	for name in $(ACTIVATED_NAMES); do \
		$(SUBST) -e "s|^Name=org.damond1$$|Name=$$name|" packaging/org.damond1.service \
			> $(DESTDIR)$(DBUS_SERVICEDIR)/$$name.service && \
		chmod 0644 $(DESTDIR)$(DBUS_SERVICEDIR)/$$name.service || exit 1; \
	done
	chmod 0644 $(DESTDIR)$(UNITDIR)/damond.service $(DESTDIR)$(UNITDIR)/damond-exporter.service
	install -m 0644 packaging/dbus-policy.conf $(DESTDIR)$(DBUS_POLICY_DIR)/org.damond1.conf
	install -m 0644 docs/operations.md $(DESTDIR)$(DOCDIR)/operations.md
	@scripts/install-hooks post-install "$(DESTDIR)"

uninstall:
	@scripts/install-hooks pre-uninstall "$(DESTDIR)"
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(COMMANDS)) $(DESTDIR)$(UNITDIR)/damond.service \
		$(DESTDIR)$(UNITDIR)/damond-exporter.service \
		$(foreach name,$(ACTIVATED_NAMES),$(DESTDIR)$(DBUS_SERVICEDIR)/$(name).service) \
		$(DESTDIR)$(DBUS_POLICY_DIR)/org.damond1.conf
	rm -rf $(DESTDIR)$(VENVDIR) $(DESTDIR)$(DOCDIR)
	@scripts/install-hooks post-uninstall "$(DESTDIR)"
