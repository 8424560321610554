//! The ServiceAccount side of the provisioner: the ServiceAccounts of a namespace, the pull
//! Secret added to (or taken back from) their `imagePullSecrets`, and, per ServiceAccount, the
//! owner reference a Secret gets (with a short memory of the ones found missing).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, Patch, PatchParams};

use super::{ProvisionError, Provisioner};
use crate::core::accounts::{self, Write};
use crate::core::patch;
use crate::secret::pacer::Caller;

/// ServiceAccount lists are served from the API server's watch cache (`resourceVersion=0`)
/// instead of a quorum read from etcd: with many namespaces opting in at once, or ServiceAccounts
/// created while the webhook was down, these lists come by the thousand. Such a list can lag a
/// little. A patch computed from an older version fails its `resourceVersion` test and is
/// redone; a ServiceAccount created moments ago and missing from the list was patched at its
/// admission, or is picked up by the namespace's next reconcile.
fn service_account_list() -> ListParams {
    ListParams::default().match_any()
}

impl Provisioner {
    /// The names of the namespace's ServiceAccounts.
    pub(crate) async fn service_accounts(
        &self,
        namespace: &str,
    ) -> Result<Vec<String>, ProvisionError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let list = api
            .list_metadata(&service_account_list())
            .await
            .map_err(|e| ProvisionError::ListServiceAccounts {
                namespace: namespace.into(),
                source: e.into(),
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|m| m.metadata.name)
            .collect())
    }

    /// Adds the Secret to every existing ServiceAccount of the namespace that lacks it (those
    /// created later are patched at admission). Returns how many were patched.
    /// With `serviceAccounts: apply` by server-side apply, with `never` not at all.
    pub(crate) async fn attach_to_service_accounts(
        &self,
        namespace: &str,
    ) -> Result<usize, ProvisionError> {
        match self.settings.service_accounts().refresher_writes() {
            Some(Write::JsonPatch) => {
                self.for_each_service_account(namespace, patch::for_service_account)
                    .await
            }
            Some(Write::ServerSideApply) => self.apply_to_service_accounts(namespace).await,
            None => Ok(0),
        }
    }

    /// `serviceAccounts: apply`: attaches the Secret to every ServiceAccount of the namespace
    /// that lacks it by server-side apply as [`accounts::FIELD_MANAGER`] (`core::accounts`
    /// says what is sent and whether with force). One failing ServiceAccount does not stop the
    /// others. Returns how many were changed.
    async fn apply_to_service_accounts(&self, namespace: &str) -> Result<usize, ProvisionError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&service_account_list()).await.map_err(|e| {
            ProvisionError::ListServiceAccounts {
                namespace: namespace.into(),
                source: e.into(),
            }
        })?;
        let mut applied = 0;
        let mut first_error = None;
        for sa in list {
            match self.apply_service_account(&api, namespace, sa).await? {
                Ok(true) => applied += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    /// Applies the plan for one ServiceAccount, reading it again when it changed in between
    /// (409: its `resourceVersion`, or a conflict over a field another manager took meanwhile;
    /// the plan is made anew from what is read). Results as [`Self::patch_service_account`].
    async fn apply_service_account(
        &self,
        api: &Api<ServiceAccount>,
        namespace: &str,
        sa: ServiceAccount,
    ) -> Result<Result<bool, ProvisionError>, ProvisionError> {
        let name = sa.metadata.name.clone().unwrap_or_default();
        let secret = self
            .settings
            .secret_of(&self.settings.subject_for(namespace, &name));
        let mut current = Some(sa);
        for _attempt in 0..3 {
            let Some(sa) = current.take() else {
                return Ok(Ok(false));
            };
            let plan =
                accounts::plan_apply(&serde_json::to_value(&sa).unwrap_or_default(), &secret);
            if let Some(manager) = &plan.declared_by {
                tracing::warn!(
                    namespace,
                    service_account = %name,
                    field_manager = %manager,
                    secret = %secret,
                    "imagePullSecrets is declared by another server-side apply and lacks the pull Secret: left to it (add the Secret to that manifest; Pods still get it at admission)"
                );
            }
            let Some(body) = plan.body else {
                return Ok(Ok(false));
            };
            let mut params = PatchParams::apply(accounts::FIELD_MANAGER);
            params.force = plan.force;
            match api.patch(&name, &params, &Patch::Apply(body)).await {
                Ok(_) => return Ok(Ok(true)),
                // Gone, or (an apply with a resourceVersion to an absent object) not there to
                // create: never created by this service.
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Ok(false)),
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => {
                    current = api
                        .get_opt(&name)
                        .await
                        .map_err(|e| self.sa_error("reading", namespace, &name, e))?;
                }
                Err(e) => return Ok(Err(self.sa_error("applying", namespace, &name, e))),
            }
        }
        Ok(Err(ProvisionError::Contended {
            action: "applying",
            kind: "ServiceAccount",
            namespace: namespace.into(),
            name,
            reason: "it kept changing while being applied",
        }))
    }

    /// Applies `make`'s patch to every ServiceAccount of the namespace. Each patch is tied to the
    /// version it was computed from (a `test` of `resourceVersion`), so an edit in between (the
    /// token controller adds to `secrets`) is never overwritten: that ServiceAccount is read
    /// again and patched anew. One failing ServiceAccount does not stop the others.
    pub(super) async fn for_each_service_account(
        &self,
        namespace: &str,
        make: fn(&serde_json::Value, &str) -> json_patch::Patch,
    ) -> Result<usize, ProvisionError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&service_account_list()).await.map_err(|e| {
            ProvisionError::ListServiceAccounts {
                namespace: namespace.into(),
                source: e.into(),
            }
        })?;
        let mut patched = 0;
        let mut first_error = None;
        for sa in list {
            match self
                .patch_service_account(&api, namespace, sa, make)
                .await?
            {
                Ok(true) => patched += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(patched),
        }
    }

    /// Applies `make`'s patch to one ServiceAccount, reading it again when it changed under the
    /// patch: `Ok(Ok(true))` if it was patched, `Ok(Ok(false))` if there was nothing to do or it
    /// is gone, `Ok(Err(_))` if it could not be patched (the others still are), `Err(_)` if it
    /// could not be read again (that ends the pass).
    async fn patch_service_account(
        &self,
        api: &Api<ServiceAccount>,
        namespace: &str,
        sa: ServiceAccount,
        make: fn(&serde_json::Value, &str) -> json_patch::Patch,
    ) -> Result<Result<bool, ProvisionError>, ProvisionError> {
        let name = sa.metadata.name.clone().unwrap_or_default();
        let secret = self
            .settings
            .secret_of(&self.settings.subject_for(namespace, &name));
        let mut current = Some(sa);
        for _attempt in 0..3 {
            // None: deleted meanwhile.
            let Some(sa) = current.take() else {
                return Ok(Ok(false));
            };
            let value = serde_json::to_value(&sa).unwrap_or_default();
            let mut p = make(&value, &secret);
            if p.0.is_empty() {
                return Ok(Ok(false));
            }
            p.0.insert(
                0,
                json_patch::PatchOperation::Test(json_patch::TestOperation {
                    path: json_patch::jsonptr::PointerBuf::from_tokens([
                        "metadata",
                        "resourceVersion",
                    ]),
                    value: serde_json::json!(sa.metadata.resource_version),
                }),
            );
            // Named, so that `managedFields` shows this service as the updater (Argo CD's
            // `managedFieldsManagers` ignores by that name).
            let params = PatchParams {
                field_manager: Some(accounts::FIELD_MANAGER.into()),
                ..Default::default()
            };
            match api.patch(&name, &params, &Patch::<()>::Json(p)).await {
                Ok(_) => return Ok(Ok(true)),
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Ok(false)),
                // The `test` failed: the ServiceAccount changed since it was read.
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                    current = api
                        .get_opt(&name)
                        .await
                        .map_err(|e| self.sa_error("reading", namespace, &name, e))?;
                }
                Err(e) => return Ok(Err(self.sa_error("patching", namespace, &name, e))),
            }
        }
        // Changed under us three times in a row: report it so the reconcile is retried.
        Ok(Err(ProvisionError::Contended {
            action: "patching",
            kind: "ServiceAccount",
            namespace: namespace.into(),
            name,
            reason: "it kept changing while being patched",
        }))
    }

    fn sa_error(
        &self,
        action: &'static str,
        namespace: &str,
        name: &str,
        e: kube::Error,
    ) -> ProvisionError {
        ProvisionError::ServiceAccount {
            action,
            namespace: namespace.into(),
            name: name.into(),
            source: e.into(),
        }
    }

    /// An owner reference to ServiceAccount `namespace/name`; `NoServiceAccount` if it does
    /// not exist (for an admission, also when it did not a moment ago: no GET then).
    pub(super) async fn owner(
        &self,
        namespace: &str,
        name: &str,
        caller: Caller,
    ) -> Result<OwnerReference, ProvisionError> {
        let key = format!("{namespace}/{name}");
        let absent = || ProvisionError::NoServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        };
        if caller == Caller::Admission && self.absent_accounts.contains_key(&key) {
            return Err(absent());
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let found = api
            .get_opt(name)
            .await
            .map_err(|e| self.sa_error("reading", namespace, name, e))?;
        let Some(sa) = found else {
            self.absent_accounts.insert(key, ()).await;
            return Err(absent());
        };
        if caller == Caller::Refresher {
            self.absent_accounts.invalidate(&key).await;
        }
        Ok(OwnerReference {
            api_version: "v1".into(),
            kind: "ServiceAccount".into(),
            name: name.into(),
            uid: sa.metadata.uid.unwrap_or_default(),
            ..Default::default()
        })
    }
}
